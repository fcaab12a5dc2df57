import sys

from serve.worker.main import main

sys.exit(main(sys.argv[1:]))
