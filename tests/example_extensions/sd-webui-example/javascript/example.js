// Loaded into the page's <head> with every other extension's javascript/*.js.
window.exampleExtensionLoaded = "example-js-ok";
