# The two commands a newcomer needs (see README.md). Each sets up what it needs first.
.PHONY: run test setup

run:
	scripts/setup.sh
	.venv/bin/python -m streamlit run app.py --server.port 8501 --server.headless true --browser.gatherUsageStats false

test:
	scripts/setup.sh --dev
	.venv/bin/python -m pytest -q
