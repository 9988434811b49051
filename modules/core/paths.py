"""Where everything lives, computed once from the flags.

--data-dir moves all user data (models, outputs, extensions, config.json);
the per-folder flags override single folders, as in A1111.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

INSTALL_DIR = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AppPaths:
    install_dir: Path
    data_dir: Path
    models_dir: Path
    ckpt_dir: Path
    vae_dir: Path
    lora_dir: Path
    esrgan_dir: Path
    embeddings_dir: Path
    hypernetwork_dir: Path
    outputs_dir: Path
    extensions_dir: Path
    extensions_builtin_dir: Path
    configs_dir: Path
    config_file: Path
    styles_files: tuple[Path, ...]
    cache_file: Path

    @classmethod
    def from_opts(cls, opts: argparse.Namespace, install_dir: Path = INSTALL_DIR) -> "AppPaths":
        def opt_path(value: str | None, default: Path) -> Path:
            return Path(value).expanduser().resolve() if value else default

        data_dir = opt_path(opts.data_dir, install_dir)
        models_dir = opt_path(opts.models_dir, data_dir / "models")
        styles = tuple(Path(s).expanduser().resolve() for s in (opts.styles_file or [])) or (data_dir / "styles.csv",)
        return cls(
            install_dir=install_dir,
            data_dir=data_dir,
            models_dir=models_dir,
            ckpt_dir=opt_path(opts.ckpt_dir, models_dir / "Stable-diffusion"),
            vae_dir=opt_path(opts.vae_dir, models_dir / "VAE"),
            lora_dir=opt_path(opts.lora_dir, models_dir / "Lora"),
            esrgan_dir=models_dir / "ESRGAN",
            embeddings_dir=opt_path(opts.embeddings_dir, data_dir / "embeddings"),
            hypernetwork_dir=opt_path(opts.hypernetwork_dir, models_dir / "hypernetworks"),
            outputs_dir=data_dir / "outputs",
            extensions_dir=data_dir / "extensions",
            extensions_builtin_dir=install_dir / "extensions-builtin",
            configs_dir=install_dir / "configs",
            config_file=opt_path(opts.ui_settings_file, data_dir / "config.json"),
            styles_files=styles,
            cache_file=data_dir / "cache.json",
        )

    def ensure_user_dirs(self) -> None:
        """Create the user folders, so a fresh --data-dir is usable at once."""
        for d in (self.ckpt_dir, self.vae_dir, self.lora_dir, self.esrgan_dir, self.embeddings_dir,
                  self.outputs_dir, self.extensions_dir, self.models_dir / "ControlNet"):
            d.mkdir(parents=True, exist_ok=True)
