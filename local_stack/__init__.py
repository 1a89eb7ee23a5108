"""Running the three services as local processes on free ports, and where the shipped reference pair
and prompts live: what the demo, the bench, the study and the tests share, below the CLI.
"""
