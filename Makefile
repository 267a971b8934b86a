# The two commands a newcomer needs (see README.md). Each sets up what it needs first.
# `make check` is the quick loop while working: the linter and the unit tests (a few minutes).
.PHONY: run test check setup

run:
	scripts/setup.sh
	.venv/bin/python -m streamlit run app.py --server.port 8501 --server.headless true --browser.gatherUsageStats false

test:
	scripts/setup.sh --dev
	.venv/bin/python -m pytest -q --durations=25

check:
	scripts/setup.sh --dev
	.venv/bin/python -m ruff check .
	.venv/bin/python -m pytest -q -m unit
