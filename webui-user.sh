#!/usr/bin/env bash
# Your settings for webui.sh. This file is read by webui.sh at every start.

# Flags for webui.py, e.g. "--listen --api --gradio-auth me:secret"
#export COMMANDLINE_ARGS=""

# The python used to create the venv (3.10 or newer)
#python_cmd="python3"

# Where the venv lives; "-" means use python_cmd directly, without a venv
#venv_dir="venv"
