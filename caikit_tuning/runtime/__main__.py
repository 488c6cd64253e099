"""`python -m caikit_tuning.runtime [--config runtime_config.yaml] [--host 127.0.0.1]`"""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
