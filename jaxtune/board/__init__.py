"""`jaxtune board`: a local web page to configure, launch, watch and compare runs, and chat with the result.

Everything the page does goes through what the CLI already is: the typed config (`jaxtune.config`), a
`jaxtune train` subprocess, the run directory's files (`config.yaml`, `status.json`, `metrics.jsonl`,
`train.log`), `jaxtune export` and the decoder of `jaxtune chat`. Needs the `board` extra
(`pip install -e ".[board]"`).
"""
