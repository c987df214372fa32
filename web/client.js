// Hubbub's browser client: filled in by the browser-client issue.
export {};
