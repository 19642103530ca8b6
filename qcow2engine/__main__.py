from qcow2engine.cli.main import run

run()
