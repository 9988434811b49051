@echo off
rem Launcher for Windows: prepares venv\ and the pinned requirements, then starts webui.py.
rem Settings live in webui-user.bat (COMMANDLINE_ARGS, PYTHON, VENV_DIR).
setlocal
cd /d "%~dp0"
if "%PYTHON%"=="" set "PYTHON=python"
if "%VENV_DIR%"=="" set "VENV_DIR=%~dp0venv"

%PYTHON% -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)"
if errorlevel 1 (
    echo webui.bat: error: Python 3.10 or newer is required. Install it, or set PYTHON in webui-user.bat.
    exit /b 1
)

if "%VENV_DIR%"=="-" (
    set "PY=%PYTHON%"
) else (
    if not exist "%VENV_DIR%\Scripts\python.exe" (
        echo Creating venv in %VENV_DIR%
        %PYTHON% -m venv "%VENV_DIR%" || (echo webui.bat: error: could not create the venv & exit /b 1)
    )
    set "PY=%VENV_DIR%\Scripts\python.exe"
)

set "SKIP_INSTALL="
set "EXIT_AFTER="
for %%a in (%* %COMMANDLINE_ARGS%) do (
    if "%%~a"=="--skip-install" set "SKIP_INSTALL=1"
    if "%%~a"=="--exit" set "EXIT_AFTER=1"
)

if not defined SKIP_INSTALL (
    rem install_requirements.py keeps a stamp and installs only when requirements.txt changed.
    "%PY%" tools\install_requirements.py requirements.txt || exit /b 1
)
if defined EXIT_AFTER (
    echo Environment ready; exiting ^(--exit^).
    exit /b 0
)
"%PY%" webui.py %*
