"""The ``gpu2mass`` command line (typer). Thin: parse, build the request, call the library."""
