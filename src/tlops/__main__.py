"""``python -m tlops``: the same CLI as the ``tlops`` console script (DVC stages call it this way,
through the interpreter tlops is installed in, so no environment has to be on ``PATH``)."""

from tlops.cli import main

if __name__ == "__main__":
    main()
