// The chat page's script: filled in by the browser-client issue.
