"""Command line behind the deploy make targets.

    python -m tools.deploy check                          # make deploy-check
    python -m tools.deploy images [--tag T] [--repo R] [--base B] [--push]   # make images
    python -m tools.deploy deploy --env local|prod [--image-tag T] [--image-repo R]
    python -m tools.deploy render --env local|prod [--image-tag T] [--image-repo R]
    python -m tools.deploy init --name N [--host H] [--image-repo R] [--backup-path P]

`--env` also takes an installation made by `init` (deploy/installations/N, git-ignored).

Exit status: 0 done, 1 failed or not possible here (message on stderr), 2 bad usage.
Empty option values count as absent, so make can pass unset variables through.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.deploy import images, installation, rollout
from tools.deploy.check import run_check
from tools.deploy.layout import APP_IMAGE, DEPLOY_DIR, OPERATIONS_DOC, PLACEHOLDER_MARK, RENDER_DIR
from tools.deploy.render import RenderError, render


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.deploy", description="SnapSell deploy")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="render, validate and policy-check every overlay")
    check.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    check.add_argument("--operations-doc", type=Path, default=OPERATIONS_DOC)

    build = commands.add_parser("images", help="build the application image")
    build.add_argument("--tag", default="", help="default: the git revision")
    build.add_argument("--repo", default="", help=f"default: {APP_IMAGE}")
    build.add_argument(
        "--base",
        default="",
        help=f"{images.OFFICIAL_BASE} or {images.LOCAL_BASE}; default: "
        f"{images.OFFICIAL_BASE} with --push, else {images.LOCAL_BASE}",
    )
    build.add_argument("--push", action="store_true")

    for name, text in (("deploy", "build, ship and apply an overlay"), ("render", "print it")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--env", default="", help="local or prod")
        command.add_argument("--image-tag", default="", help="required for prod")
        command.add_argument("--image-repo", default="", help="default: the overlay's")
        command.add_argument("--render-dir", type=Path, default=RENDER_DIR)

    init = commands.add_parser("init", help="make deploy/installations/NAME from the template")
    init.add_argument("--name", default="", help="the installation, e.g. eu-prod")
    init.add_argument("--host", default="", help="public host of the webhooks (PUBLIC_BASE_URL)")
    init.add_argument("--image-repo", default="", help="where the application image is pushed")
    init.add_argument("--backup-path", default="", help="s3://bucket/prefix of the backups")
    init.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    return parser


def _init(args: argparse.Namespace) -> int:
    values = installation.Values(args.host, args.image_repo, args.backup_path)
    try:
        made = installation.create(args.name, values, args.deploy_dir)
    except installation.InstallationError as error:
        print(f"make deploy-init: {error}", file=sys.stderr)
        return 1
    shown = installation.shown(made)
    print(f"wrote {shown}/kustomization.yaml (git-ignored)")
    try:
        left = installation.placeholder_sources(render(made), made)
    except RenderError as error:
        print(f"make deploy-init: {error}", file=sys.stderr)
        return 1
    for line in left:
        print(f"  still '{PLACEHOLDER_MARK}': {line}")
    print(f"then: make deploy ENV={args.name} IMAGE_TAG=...")
    return 0


def _images(tag: str, repo: str, base: str, push: bool) -> int:
    try:
        reference = f"{repo or APP_IMAGE}:{images.check_tag(tag or images.default_tag())}"
        base = base or (images.OFFICIAL_BASE if push else images.LOCAL_BASE)
        if push and base != images.OFFICIAL_BASE:
            # What a registry receives is what production runs: the pinned official base.
            raise images.ImageError(f"only images on the {images.OFFICIAL_BASE} base are pushed")
        engine = images.detect_engine()
        if engine is None:
            raise images.ImageError(images.NO_ENGINE)
        built = images.build(engine, reference, base)
        print(built.summary())
        if push:
            images.push(engine, reference)
    except images.ImageError as error:
        print(f"make images: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return run_check(args.deploy_dir, args.operations_doc)
    if args.command == "images":
        return _images(args.tag, args.repo, args.base, args.push)
    if args.command == "init":
        return _init(args)
    run = rollout.deploy if args.command == "deploy" else rollout.render_only
    return run(args.env, args.image_tag or None, args.image_repo or None, args.render_dir)


if __name__ == "__main__":
    sys.exit(main())
