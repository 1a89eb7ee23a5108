"""`specdec serve openai`: an OpenAI-compatible HTTP API (completions, chat completions, models) in front
of an orchestrator, which it calls through the SDK like any other application."""
