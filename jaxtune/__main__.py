"""``python -m jaxtune`` is the ``jaxtune`` command."""

from jaxtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
