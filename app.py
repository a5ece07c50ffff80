"""Finetune Studio: start the browser studio (``python app.py --help``).

On a fresh clone it opens on the bundled demo: a tiny model built at first
start and a small Q&A dataset about the studio, so dataset -> train -> watch
-> export -> chat works on a CPU in a few minutes with nothing downloaded.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a GPU box

if __name__ == "__main__":
    from studio.app import main

    sys.exit(main())
