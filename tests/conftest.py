"""Suite-wide: a training run points the `jaxtune` logger at its run directory and stops it propagating (no
duplicate lines under a configured root logger); undo that after each test so `caplog` sees jaxtune's records
whatever ran before."""

import logging

import pytest


@pytest.fixture(autouse=True)
def _jaxtune_logger_propagates():
    yield
    logger = logging.getLogger("jaxtune")
    for handler in [h for h in logger.handlers if getattr(h, "_jaxtune", False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
