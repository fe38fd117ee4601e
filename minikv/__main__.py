import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned tensor-parallel rank imports the parent's main module
    sys.exit(main())
