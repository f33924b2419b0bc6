"""`python -m qat_tasks.serving --model intent-classifier`: the serving component on its own."""

from qat_tasks.serving.app import main

raise SystemExit(main())
