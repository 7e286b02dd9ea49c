"""The board's labels in English and Chinese (the language switch at the top of the page).

`LABELS[key] = (English, Chinese)`. Keys are the config's dotted field names for form fields, and short names
for everything else. Messages that come from jaxtune itself (config errors, data errors, the log) stay as
jaxtune writes them, in English, so they match the CLI and the documentation word for word.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "zh": "中文"}

LABELS: dict[str, tuple[str, str]] = {
    # page
    "title": ("jaxtune board", "jaxtune 训练面板"),
    "subtitle": (
        "Configure, launch, watch and compare fine-tuning runs, then chat with the result. Every field is a "
        "config field; the run is a `jaxtune train` process.",
        "配置、启动、监控和比较微调任务，然后与训练结果对话。每个字段都是配置字段；训练是一个 `jaxtune train` 进程。",
    ),
    "language": ("Language", "语言"),
    "tab_train": ("Train", "训练"),
    "tab_runs": ("Runs", "运行记录"),
    "tab_chat": ("Chat", "对话"),
    # configure
    "base_config": ("Base config (YAML file; empty: the defaults)", "基础配置（YAML 文件；留空则用默认值）"),
    "load_base": ("Load", "加载"),
    "check_model": ("Check model", "检查模型"),
    "list_datasets": ("List datasets", "列出数据集"),
    "preview": ("Preview a sample", "预览样本"),
    "extra": (
        "More overrides (one section.field=value per line)",
        "更多覆盖项（每行一个 section.field=value）",
    ),
    "config_path": ("Save config as", "配置保存路径"),
    "validate": ("Check config", "检查配置"),
    "save": ("Save YAML", "保存 YAML"),
    "estimate": ("Estimate memory", "估算显存"),
    "start": ("Start", "开始训练"),
    "stop": ("Stop (checkpoint)", "停止（保存检查点）"),
    "resume": ("Resume", "继续训练"),
    "yaml": ("Config (YAML)", "配置（YAML）"),
    "command": ("Equivalent command", "等价命令"),
    "sec_model": ("Model", "模型"),
    "sec_data": ("Data", "数据"),
    "sec_method": ("Stage and method", "阶段与方法"),
    "sec_training": ("Training", "训练参数"),
    "sec_launch": ("Launch and watch", "启动与监控"),
    "watch_run": ("Run directory", "运行目录"),
    "log": ("Log", "日志"),
    "loss_curve": ("Loss", "损失曲线"),
    "eval_curve": ("Eval and reward", "评估与奖励曲线"),
    "status": ("Status", "状态"),
    # fields
    "model.path": ("Model directory (Hugging Face)", "模型目录（Hugging Face 格式）"),
    "model.tokenizer": ("Tokenizer (empty: the model's)", "分词器（留空则用模型自带）"),
    "stage": ("Stage", "训练阶段"),
    "method.name": ("Method", "微调方法"),
    "method.rank": ("LoRA rank", "LoRA 秩"),
    "method.alpha": ("LoRA alpha", "LoRA alpha"),
    "method.dropout": ("LoRA dropout", "LoRA dropout"),
    "method.target_modules": ("Target modules", "目标模块"),
    "model.quantization": ("Base quantization", "基座量化"),
    "method.adapter_size": ("Adapter size", "Adapter 维度"),
    "method.num_virtual_tokens": ("Virtual tokens", "虚拟 token 数"),
    "method.freeze_trainable_layers": ("Trainable layers (freeze-tuning)", "可训练层数（冻结微调）"),
    "data.dataset_dir": ("Dataset directory (dataset_info.json)", "数据集目录（dataset_info.json）"),
    "data.train": ("Datasets", "数据集"),
    "data.template": ("Chat template (empty: the tokenizer's)", "对话模板（留空则用分词器自带）"),
    "data.cutoff_len": ("Cutoff length", "截断长度"),
    "data.packing": ("Packing", "序列打包"),
    "data.val_size": ("Validation size", "验证集比例"),
    "training.learning_rate": ("Learning rate", "学习率"),
    "training.num_epochs": ("Epochs", "训练轮数"),
    "training.max_steps": ("Max steps (-1: epochs)", "最大步数（-1 按轮数）"),
    "training.batch_size": ("Batch size", "批大小"),
    "training.micro_batch_size": ("Micro-batch (accumulation)", "微批大小（梯度累积）"),
    "training.warmup_ratio": ("Warm-up ratio", "预热比例"),
    "training.eval_every": ("Eval every (steps)", "评估间隔（步）"),
    "training.save_every": ("Save every (steps)", "保存间隔（步）"),
    "logging.log_every": ("Log every (steps)", "日志间隔（步）"),
    "dpo.beta": ("DPO beta", "DPO beta"),
    "dpo.loss_type": ("DPO loss", "DPO 损失"),
    "ppo.reward_model": ("Reward model directory", "奖励模型目录"),
    "grpo.num_generations": ("Completions per prompt", "每个提示的生成数"),
    "grpo.reward_fns": ("Reward functions", "奖励函数"),
    "output_dir": ("Output directory", "输出目录"),
    # runs
    "refresh": ("Refresh", "刷新"),
    "runs_table": ("Runs", "运行列表"),
    "compare": ("Compare runs", "比较运行"),
    "metric": ("Metric", "指标"),
    "compare_plot": ("Curves", "曲线"),
    "export_run": ("Run to export", "要导出的运行"),
    "export_kind": ("Export as", "导出方式"),
    "export": ("Export", "导出"),
    "export_out": ("Export result", "导出结果"),
    # chat
    "chat_exports": ("Exports of the runs", "运行的导出结果"),
    "chat_model": ("Model or run directory", "模型或运行目录"),
    "chat_adapter": ("PEFT adapter (optional)", "PEFT adapter（可选）"),
    "chat_template": ("Chat template (empty: the tokenizer's)", "对话模板（留空则用分词器自带）"),
    "load_model": ("Load", "加载模型"),
    "unload_model": ("Unload", "卸载模型"),
    "system": ("System prompt", "系统提示词"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "temperature": ("Temperature (0: greedy)", "温度（0 为贪心）"),
    "top_k": ("Top-k (0: off)", "Top-k（0 为关闭）"),
    "top_p": ("Top-p", "Top-p"),
    "chatbot": ("Conversation", "对话"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "no_model": ("No model loaded.", "尚未加载模型。"),
}


def text(key: str, lang: str = "en") -> str:
    en, zh = LABELS[key]
    return zh if lang == "zh" else en
