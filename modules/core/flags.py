"""Command-line flags with AUTOMATIC1111's names and meanings.

The parser is built by a function (not at import) so extensions' preload.py
can add flags to it before parsing, as in A1111.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

DEFAULT_PORT = 7860
DEFAULT_API_ONLY_PORT = 7861


class FlagError(Exception):
    """A bad command line; the message is meant for the user as-is."""


# A1111 flags that have no meaning here. They are accepted so old
# COMMANDLINE_ARGS keep working, with a one-line notice each.
# name -> (takes a value, why it does nothing here)
LEGACY_FLAGS: dict[str, tuple[bool, str]] = {
    "--xformers": (False, "PyTorch SDPA attention is always used"),
    "--force-enable-xformers": (False, "PyTorch SDPA attention is always used"),
    "--reinstall-xformers": (False, "xformers is not used"),
    "--reinstall-torch": (False, "torch is pinned in requirements.txt"),
    "--opt-sdp-attention": (False, "PyTorch SDPA attention is always used"),
    "--opt-sdp-no-mem-attention": (False, "PyTorch SDPA attention is always used"),
    "--opt-split-attention": (False, "PyTorch SDPA attention is always used"),
    "--opt-split-attention-v1": (False, "PyTorch SDPA attention is always used"),
    "--opt-split-attention-invokeai": (False, "PyTorch SDPA attention is always used"),
    "--opt-sub-quad-attention": (False, "PyTorch SDPA attention is always used"),
    "--disable-opt-split-attention": (False, "PyTorch SDPA attention is always used"),
    "--opt-channelslast": (False, "channels_last was slower in our measurements"),
    "--upcast-sampling": (False, "precision follows --no-half / --precision"),
    "--disable-nan-check": (False, "there is no NaN check to disable"),
    "--skip-torch-cuda-test": (False, "there is no CUDA test at start"),
    "--skip-python-version-check": (False, "the launcher checks the version itself"),
    "--skip-version-check": (False, "there is no version check"),
    "--skip-prepare-environment": (False, "webui.sh prepares the environment"),
    "--update-check": (False, "there is no update check"),
    "--update-all-extensions": (False, "update extensions from the Extensions tab"),
    "--no-download-sd-model": (False, "models are never downloaded"),
    "--do-not-download-clip": (False, "models are never downloaded"),
    "--disable-safe-unpickle": (False, "checkpoints are always loaded without running pickled code"),
    "--always-batch-cond-uncond": (False, "cond and uncond are always batched"),
    "--enable-console-prompts": (False, "prompts are not printed to the console"),
    "--no-gradio-queue": (False, "the queue is always on"),
    "--gradio-queue": (False, "the queue is always on"),
    "--no-progressbar-hiding": (False, "progress bars are not hidden"),
    "--deepdanbooru": (False, "interrogation is not available"),
    "--log-startup": (False, "startup is not profiled"),
    "--api-log": (False, "API requests are logged at --loglevel DEBUG"),
    "--disable-model-loading-ram-optimization": (False, "loading already streams weights"),
    "--allow-code": (False, "custom code execution is not offered"),
    "--ngrok": (True, "tunnels are not offered; use --listen on your LAN"),
    "--ngrok-region": (True, "tunnels are not offered"),
    "--ngrok-options": (True, "tunnels are not offered"),
    "--gradio-img2img-tool": (True, "the img2img tools are fixed"),
    "--gradio-inpaint-tool": (True, "the inpaint tools are fixed"),
    "--ui-config-file": (True, "UI defaults live in config.json"),
    "--clip-models-path": (True, "interrogation is not available"),
}

# Flags handled by the launcher (webui.sh). webui.py accepts them so the
# same COMMANDLINE_ARGS work whichever starts first.
LAUNCHER_FLAGS = ("--skip-install", "--exit", "--test")


def _add_flags(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("network and auth")
    net.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 so other machines on your network can connect")
    net.add_argument("--server-name", default=None, help="the host name or address to bind (overrides --listen)")
    net.add_argument("--port", type=int, default=None, help=f"port to serve on (default {DEFAULT_PORT}, or {DEFAULT_API_ONLY_PORT} with --nowebui)")
    net.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs internet access)")
    net.add_argument("--gradio-auth", default=None, help='credentials for the UI: "user:password[,user2:password2]"')
    net.add_argument("--gradio-auth-path", default=None, help="a file of credentials, one user:password per line or comma-separated")
    net.add_argument("--api", action="store_true", help="serve the /sdapi/v1 API beside the UI")
    net.add_argument("--nowebui", action="store_true", help="serve only the API (implies --api)")
    net.add_argument("--api-auth", default=None, help='HTTP Basic credentials for the API: "user:password[,user2:password2]"')
    net.add_argument("--insecure-no-auth", action="store_true", help="allow --listen, --share or a non-local --server-name without any login (anyone who reaches the port can use everything)")
    net.add_argument("--allowed-hosts", default=None, help='extra Host names this server answers to, comma-separated (a reverse proxy\'s public name); "*" turns the Host check off')
    net.add_argument("--cors-allow-origins", default=None, help="comma-separated origins allowed for cross-origin requests")
    net.add_argument("--cors-allow-origins-regex", default=None, help="a regex of origins allowed for cross-origin requests")
    net.add_argument("--tls-keyfile", default=None, help="TLS private key file (with --tls-certfile) to serve HTTPS")
    net.add_argument("--tls-certfile", default=None, help="TLS certificate file (with --tls-keyfile) to serve HTTPS")
    net.add_argument("--subpath", default=None, help="serve the UI under this URL path, e.g. /sd")
    net.add_argument("--timeout-keep-alive", type=int, default=30, help="HTTP keep-alive timeout in seconds")
    # The job queue: bounds and who may act on any job (docs/security.md, "The queue").
    net.add_argument("--queue-max-per-client", type=int, default=4, metavar="N", help="unfinished (queued or running) jobs one client may have; more are refused with 429 (client: the logged-in user, else the address)")
    net.add_argument("--queue-max-total", type=int, default=32, metavar="N", help="jobs that may wait in the queue, all clients together; more are refused with 503")
    net.add_argument("--admin-users", default=None, metavar="USERS", help='comma-separated logged-in users who may interrupt/skip any job and see every live preview')

    paths = parser.add_argument_group("paths")
    paths.add_argument("--data-dir", default=None, help="root for models/, outputs/, extensions/, config.json (default: the install folder)")
    paths.add_argument("--models-dir", default=None, help="root for the model folders (default: DATA_DIR/models)")
    paths.add_argument("--ckpt", default=None, help="a checkpoint to load at start; it is added to the list even if outside --ckpt-dir")
    paths.add_argument("--ckpt-dir", default=None, help="folder of Stable Diffusion checkpoints")
    paths.add_argument("--vae-dir", default=None, help="folder of VAE files")
    paths.add_argument("--vae-path", default=None, help="a VAE file to use for every checkpoint")
    paths.add_argument("--lora-dir", default=None, help="folder of LoRA files")
    paths.add_argument("--controlnet-dir", default=None, help="folder of ControlNet models, besides models/ControlNet")
    paths.add_argument("--embeddings-dir", default=None, help="folder of textual inversion embeddings")
    paths.add_argument("--hypernetwork-dir", default=None, help="folder of hypernetworks (default: models/hypernetworks)")
    for folder in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "ScuNET", "GFPGAN", "Codeformer"):  # upscalers, faces
        paths.add_argument(f"--{folder.lower()}-models-path", default=None, help=f"folder of {folder} models (default: models/{folder})")
    paths.add_argument("--ui-settings-file", default=None, help="settings file (default: DATA_DIR/config.json)")
    paths.add_argument("--styles-file", default=None, action="append", help="styles CSV file (default: DATA_DIR/styles.csv)")

    dev = parser.add_argument_group("precision and devices")
    dev.add_argument("--no-half", action="store_true", help="run the model in fp32 on the GPU")
    dev.add_argument("--no-half-vae", action="store_true", help="run the VAE in fp32 on the GPU")
    dev.add_argument("--precision", choices=("full", "half", "autocast"), default="autocast", help="evaluate in this precision")
    dev.add_argument("--medvram", action="store_true", help="move model parts to the GPU only while they run")
    dev.add_argument("--lowvram", action="store_true", help="offload layer by layer (slowest, least GPU memory)")
    dev.add_argument("--medvram-sdxl", action="store_true", help="--medvram for SDXL models only")
    dev.add_argument("--lowram", action="store_true", default=None, help="CPU: keep weights in the file's fp16/bf16 and upcast layer by layer (default: on when RAM is under 16 GB)")
    dev.add_argument("--no-lowram", dest="lowram", action="store_false", help="CPU: convert weights to fp32 at load even when RAM is short")
    dev.add_argument("--opt-compile", action="store_true", help="CUDA: compile the UNet and VAE decoder with torch.compile (slow first image per size)")
    dev.add_argument("--use-cpu", nargs="+", default=[], metavar="MODULE", help='run these on the CPU: "all", or module names')
    dev.add_argument("--device-id", default=None, help="CUDA device index to use")

    launch = parser.add_argument_group("launcher, UI and extensions")
    launch.add_argument("--skip-install", action="store_true", help="skip installing requirements (launcher)")
    launch.add_argument("--exit", action="store_true", help="prepare the environment, then exit (launcher)")
    launch.add_argument("--test", action="store_true", help=argparse.SUPPRESS)
    launch.add_argument("--no-hashing", action="store_true", help="do not compute sha256 hashes of checkpoints")
    launch.add_argument("--skip-load-model-at-start", action="store_true", help="load the checkpoint on the first generation instead of right after start")
    launch.add_argument("--enable-insecure-extension-access", action="store_true", help="allow installing extensions even when the server is reachable from other machines")
    launch.add_argument("--disable-all-extensions", action="store_true", help="load no extensions, built-in ones included")
    launch.add_argument("--disable-extra-extensions", action="store_true", help="load only the built-in extensions")
    launch.add_argument("--autolaunch", action="store_true", help="open the UI in the default browser at start")
    launch.add_argument("--theme", choices=("light", "dark"), default=None, help="force the UI theme")
    launch.add_argument("--freeze-settings", action="store_true", help="make the Settings tab read-only")
    launch.add_argument("--loglevel", default=None, help="log level: DEBUG, INFO, WARNING, ERROR")

    # Input limits and who may choose folders (docs/security.md); the defaults live in core/limits.py.
    lim = parser.add_argument_group("input limits and folders")
    lim.add_argument("--allow-dir-config", action="store_true", help="let the UI change output folders, file name patterns, formats and batch folders even when the server is reachable from other machines, and batch folders outside the data dir")
    lim.add_argument("--hide-ui-dir-config", action="store_true", help="lock output folders, file name patterns, formats and batch folders in the UI even on a local server")
    lim.add_argument("--max-pixels", type=int, default=None, help="largest output image in pixels, width x height (default 4194304 = 2048x2048)")
    lim.add_argument("--max-steps", type=int, default=None, help="most sampling steps (default 150)")
    lim.add_argument("--max-images", type=int, default=None, help="most images per request, batch size x batch count (default 800, A1111's UI maximum of 8 x 100)")
    lim.add_argument("--max-xyz-cells", type=int, default=None, help="most cells of one X/Y/Z plot (default 256)")
    lim.add_argument("--max-prompt-length", type=int, default=None, help="most characters in a prompt or negative prompt (default 20000)")
    lim.add_argument("--max-input-images", type=int, default=None, help="most input images per request: init images, extras batch (default 16)")
    lim.add_argument("--max-input-pixels", type=int, default=None, help="largest input image in pixels, read from its header (default 16777216 = 4096x4096)")
    lim.add_argument("--max-body-mb", type=float, default=None, help="largest HTTP request body in MB (default 50)")
    lim.add_argument("--max-upload-mb", type=float, default=None, help="largest file uploaded to the UI in MB (default 50)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that suggest the closest known flag."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise FlagError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="webui",
        description="Stable Diffusion web UI. Flags follow AUTOMATIC1111's names.",
        allow_abbrev=False,  # "--list" must not silently mean "--listen"
    )
    _add_flags(parser)
    return parser


@dataclass(frozen=True)
class ParsedArgs:
    opts: argparse.Namespace
    notices: list[str]


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def _strip_legacy(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    kept: list[str] = []
    notices: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_eq, _ = arg.partition("=")
        legacy = LEGACY_FLAGS.get(name)
        if legacy is None:
            kept.append(arg)
            i += 1
            continue
        takes_value, why = legacy
        notices.append(f"Note: {name} is accepted for compatibility and does nothing here: {why}.")
        i += 1
        if takes_value and not has_eq and i < len(argv) and not argv[i].startswith("--"):
            i += 1
    return kept, notices


def _unknown_flag_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    flags = known_flags(parser) + list(LEGACY_FLAGS)
    parts = []
    for item in unknown:
        name = item.split("=", 1)[0]
        if not name.startswith("-"):
            parts.append(f"unexpected argument {item!r} (flags start with --)")
            continue
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; run with --help to list the flags"
        parts.append(f"unknown flag {name}{hint}")
    return "; ".join(parts)


def parse_args(
    argv: Sequence[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    preloaders: Iterable[Callable[[argparse.ArgumentParser], None]] = (),
) -> ParsedArgs:
    """Parse argv plus COMMANDLINE_ARGS (appended, as A1111 does).

    Raises FlagError with a one-line, user-facing message.
    """
    env = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv)
    args += shlex.split(env.get("COMMANDLINE_ARGS", ""))
    parser = build_parser()
    for preload in preloaders:
        preload(parser)
    args, notices = _strip_legacy(args)
    opts, unknown = parser.parse_known_args(args)
    if unknown:
        raise FlagError(_unknown_flag_message(parser, unknown))
    _validate(opts)
    return ParsedArgs(opts=opts, notices=notices)


def _validate(opts: argparse.Namespace) -> None:
    if opts.port is not None and not (1 <= opts.port <= 65535):
        raise FlagError(f"--port must be between 1 and 65535, got {opts.port}")
    if opts.nowebui:
        opts.api = True
    if bool(opts.tls_keyfile) != bool(opts.tls_certfile):
        raise FlagError("--tls-keyfile and --tls-certfile must be given together")
    for flag in ("gradio_auth", "api_auth"):
        value = getattr(opts, flag)
        if value:
            parse_credentials(value, flag="--" + flag.replace("_", "-"))


def parse_credentials(text: str, *, flag: str = "--gradio-auth") -> list[tuple[str, str]]:
    """'u:p,u2:p2' (or one per line) -> [(u, p), ...]. Passwords may contain ':'.

    An entry without a password (``user`` or ``user:``) is an error: an empty password is no
    login. Messages never repeat the entry, which may be a password typed in the wrong place.
    """
    creds = []
    for number, item in enumerate((i.strip() for i in text.replace("\n", ",").split(",") if i.strip()), 1):
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise FlagError(f"{flag} expects user:password pairs separated by commas; entry {number} is not user:password")
        if not password.strip():
            raise FlagError(f"{flag}: user {user!r} has an empty password; give user:password with a password")
        creds.append((user, password))
    if not creds:
        raise FlagError(f"{flag} was given but holds no user:password pair")
    return creds


def is_non_local(opts: argparse.Namespace) -> bool:
    """A1111's rule for refusing extension installs: reachable from elsewhere."""
    return bool(opts.listen or opts.share or opts.server_name)


# Flags whose values are secrets: never shown (GET /sdapi/v1/cmd-flags, logs). Besides these, any
# flag (an extension's too) whose name says password, token, secret or key is redacted; file
# paths (--tls-keyfile, --gradio-auth-path) are not secrets.
SECRET_FLAGS = frozenset({"gradio_auth", "api_auth"})
SECRET_WORDS = ("password", "passwd", "token", "secret", "apikey", "api_key", "credential")
NOT_SECRET_SUFFIXES = ("_path", "_file", "_keyfile", "_dir")
REDACTED = "***"


def is_secret_flag(name: str) -> bool:
    name = name.lower()
    if name in SECRET_FLAGS:
        return True
    return any(w in name for w in SECRET_WORDS) and not name.endswith(NOT_SECRET_SUFFIXES)


def public_flags(opts: argparse.Namespace) -> dict:
    """The flags as parsed, with every secret value replaced by "***" (unset ones stay None/empty)."""
    return {key: (REDACTED if value and not isinstance(value, (bool, int, float)) and is_secret_flag(key) else value)
            for key, value in vars(opts).items()}


def is_loopback_name(name: str) -> bool:
    """localhost, ::1 or any 127.x address: only this machine can connect there."""
    import ipaddress

    name = name.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def network_exposure(opts: argparse.Namespace) -> str | None:
    """The flag that makes the server reachable from other machines, or None when it is not."""
    if opts.listen:
        return "--listen"
    if opts.share:
        return "--share"
    if opts.server_name and not is_loopback_name(opts.server_name):
        return f"--server-name {opts.server_name}"
    return None


def has_login(opts: argparse.Namespace) -> bool:
    return bool(opts.gradio_auth or opts.gradio_auth_path or opts.api_auth)


def login_required_error(opts: argparse.Namespace) -> str | None:
    """Why this server must not start (reachable from the network with no login), or None."""
    exposure = network_exposure(opts)
    if exposure is None or has_login(opts) or getattr(opts, "insecure_no_auth", False):
        return None
    return (f"{exposure} makes this server reachable from your network, but no login is set: add "
            f"--gradio-auth USER:PASSWORD (or --gradio-auth-path FILE, or --api-auth USER:PASSWORD), "
            f"or pass --insecure-no-auth to let anyone who reaches the port use it")


def bind_host(opts: argparse.Namespace) -> str:
    if opts.server_name:
        return opts.server_name
    return "0.0.0.0" if opts.listen else "127.0.0.1"


def bind_port(opts: argparse.Namespace) -> int:
    if opts.port is not None:
        return opts.port
    return DEFAULT_API_ONLY_PORT if opts.nowebui else DEFAULT_PORT
