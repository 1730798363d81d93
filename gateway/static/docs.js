// Swagger UI on this gateway's own OpenAPI document (a file, not an inline script, so the
// page's Content-Security-Policy can forbid inline scripts).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // The key typed into "Authorize" stays in memory, never in the browser's storage.
    persistAuthorization: false,
    displayRequestDuration: true,
  });
});
