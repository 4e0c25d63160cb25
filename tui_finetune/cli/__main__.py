"""``python -m tui_finetune.cli``: the same as the ``tui-finetune`` command."""

import sys

from tui_finetune.cli import main

sys.exit(main())
