"""`python -m dinofeat ...` is the `dinofeat` command, so launchers that run a module work too:
`accelerate launch --num_processes 8 -m dinofeat precompute SRC CACHE ...`."""

from dinofeat.cli import main

if __name__ == "__main__":
    main()
