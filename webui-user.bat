@echo off
rem Your settings for webui.bat.
set PYTHON=
set VENV_DIR=
rem Flags for webui.py, e.g. --listen --api --gradio-auth me:secret
set COMMANDLINE_ARGS=

call webui.bat %*
