# Flower and a browser for the observability tests (sourced by scripts/setup.sh; idempotent):
# Debian's Chromium, driven headless by Playwright from PyPI (tests/py/requirements.txt). The
# Playwright package cannot download its own browser here; the tests point it at this one.
apt_install chromium fonts-dejavu-core
