"""headlab's front door: ``python train.py COMMAND --help`` lists a command's options.

Commands: cache, probe, toy, detect, sweep, demo (see ``python train.py --help``). All logic lives in the
packages (``headlab.cli`` dispatches); this file only calls it.
"""

from headlab.cli import run

if __name__ == "__main__":
    run()
