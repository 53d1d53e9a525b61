import sys

from gptj.cli.main import main

sys.exit(main())
