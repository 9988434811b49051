# Runs before the command line is parsed: add the extension's own flags here.


def preload(parser):
    parser.add_argument("--example-flag", action="store_true", help="an example extension's flag")
