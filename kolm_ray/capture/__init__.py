"""The capture proxy: OpenAI/Anthropic wire in, observations out (writer, spool), the bridge API, local answers."""
