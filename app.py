"""`python app.py` will start the studio (the Gradio UI lands with the studio
issue). Until then it points to the command line, which does the same work."""

import sys

if __name__ == "__main__":
    print("The studio UI is not built yet. Use the command line: ftstudio --help "
          "(or `make demo` for the bundled demo).", file=sys.stderr)
    sys.exit(1)
