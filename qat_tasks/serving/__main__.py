"""`python -m qat_tasks.serving [--model NAME ...]`: the serving component on its own (every served encoder of the
config unless --model names some)."""

from qat_tasks.serving.app import main

raise SystemExit(main())
