@echo off
rem QLoRA Studio launcher for Windows: double-click it.
rem First run: makes a private Python environment in %LOCALAPPDATA%\qlora-studio and installs PyTorch for this
rem machine (CUDA build when an NVIDIA driver is present), the default model and the app (bootstrap.py does that);
rem later runs start the app at once. Arguments are passed to the app. Settings: packaging\README.md.
setlocal
set "HERE=%~dp0"
set "PY="

if defined QLORA_STUDIO_PYTHON call :try_python "%QLORA_STUDIO_PYTHON%"
if not defined PY call :try_python py -3.12
if not defined PY call :try_python py -3.11
if not defined PY call :try_python py -3.13
if not defined PY call :try_python py -3.10
if not defined PY call :try_python py -3
if not defined PY call :try_python python
if not defined PY goto :no_python

%PY% "%HERE%bootstrap.py" %*
set "RC=%ERRORLEVEL%"
rem Keep the window open on a failure so its message can be read.
if not "%RC%"=="0" pause
exit /b %RC%

:try_python
%* -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>&1
if not errorlevel 1 set "PY=%*"
exit /b 0

:no_python
echo QLoRA Studio needs Python 3.10 or newer, and none was found.
echo Install Python 3.12 from https://www.python.org/downloads/windows/
echo (tick "Add python.exe to PATH" in the installer), then double-click this launcher again.
pause
exit /b 1
