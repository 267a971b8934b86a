"""Streamlit glue shared by the dashboard's pages (the backend package `aptq` never imports Streamlit)."""
