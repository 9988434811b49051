// Loaded into the page's <head> with every other extension's javascript/*.js.
window.exampleExtensionLoaded = "example-js-ok";

// A1111's page helpers: onUiLoaded runs once the UI exists; gradioApp() is the page root.
onUiLoaded(() => {
  window.exampleUiLoaded = !!gradioApp().querySelector("#txt2img_prompt");
});
onUiUpdate(() => {
  window.exampleUiUpdates = (window.exampleUiUpdates || 0) + 1;
});
