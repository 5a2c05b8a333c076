"""The original's file commands: `python generate.py copy_server_files DIR | unzip | clean`."""

import fire

from policy_server.files import PolicyFiles

if __name__ == "__main__":
    fire.Fire(PolicyFiles)
