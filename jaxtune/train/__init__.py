"""The training engine: state, optimiser, jitted step, loop, checkpoints, metrics.

`jaxtune.train(config_or_path, **overrides)` is the public entry point (DESIGN.md). Because this package is
also called `jaxtune.train`, importing any of its submodules rebinds the attribute `jaxtune.train` to this
module; making the module itself callable keeps `jaxtune.train(...)` working either way.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, config_or_path, **overrides):
        from jaxtune.train.api import train

        return train(config_or_path, **overrides)


sys.modules[__name__].__class__ = _CallableModule
