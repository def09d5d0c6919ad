"""`python -m distill ...` is the `distill` command."""

from distill.cluster.cli import main

if __name__ == "__main__":
    main()
