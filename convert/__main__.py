import sys

from altjax_convert.cli import main

sys.exit(main())
