from specdec_cli.main import app

app()
