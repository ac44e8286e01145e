"""The registry's HTTP side: the REST API, the web pages and their templates, API
tokens, web sessions, access rules and the OpenAPI document. Nothing outside this
package imports it, except the service that serves it and the command line."""
