from .runtime import configure

configure()  # before the command line's modules import MLX

from .cli import main  # noqa: E402

raise SystemExit(main())
