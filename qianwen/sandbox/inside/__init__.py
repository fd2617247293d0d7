"""What runs inside the sandbox: the supervisor, the worker that runs the code, and the namespace set-up.

Standard library only, and only its cheap part: the sandboxed interpreter loads this directory by path, under a
name of its own and without qianwen (see `_BOOT` in ../box.py), and starts about as fast as plain Python. The host
imports it as `qianwen.sandbox.inside` for the message format and a few /proc reads."""
