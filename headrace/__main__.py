from headrace.cli.main import app

app(prog_name="headrace")
