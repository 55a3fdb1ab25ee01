"""`python -m headmaster`: the same as `hm`."""

from headmaster.cli import main

if __name__ == "__main__":
    main()
