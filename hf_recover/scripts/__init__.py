"""The `hf-recover` commands. Each module has `make_parser(subparsers=None)` and `main(*dataclasses)`."""
