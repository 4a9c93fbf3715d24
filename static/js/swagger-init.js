// Starts Swagger UI on the generated OpenAPI document. Kept in its own file: the console's
// Content-Security-Policy allows scripts only from this site, never inline.
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec-url"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
  });
})();
