"""File formats: the raw-night reader and writer (``shared/spec/raw-night.md``), and
later the products writer and the working database."""
