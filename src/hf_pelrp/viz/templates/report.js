(function () {
  "use strict";
  // one constant script for every report kind (text, image, generation): its hash is in the page's CSP
  function byKey(table, key) { return table ? (table[key] || table.all) : undefined; }
  function init(root) {
    var data = JSON.parse(root.querySelector("script.hfp-data").textContent);
    var hide = root.querySelector("input.hfp-hide");
    var opacity = root.querySelector("input.hfp-opacity");
    var radios = Array.prototype.slice.call(root.querySelectorAll("input.hfp-map"));
    var cells = Array.prototype.slice.call(root.querySelectorAll(".hfp-c"));
    var hash = window.location.hash;
    var wantMap = /[#&]map=([a-z]+)/.exec(hash);
    var wantSpecial = /[#&]special=(show|hide)/.exec(hash);
    radios.forEach(function (r) { if (wantMap && r.value === wantMap[1]) { r.checked = true; } });
    if (wantSpecial && hide) { hide.checked = wantSpecial[1] === "hide"; }
    if (/[#&]layers=open/.test(hash)) {
      root.querySelectorAll("details.hfp-layers").forEach(function (d) { d.open = true; });
    }
    function render() {
      var map = data.maps[0];
      radios.forEach(function (r) { if (r.checked) { map = r.value; } });
      var key = hide && hide.checked ? "visible" : "all";
      root.classList.toggle("hfp-hide-special", key === "visible");
      cells.forEach(function (s) {
        var row = data.rows[Number(s.getAttribute("data-r"))];
        var i = Number(s.getAttribute("data-i"));
        var colors = byKey(row.colors, key);
        if (!colors || !colors[map]) { return; }
        s.style.backgroundColor = colors[map][i];
        s.style.color = byKey(row.text, key)[map][i];
        if (s.hasAttribute("data-v")) { s.textContent = row.fmt[map][i]; }
      });
      root.querySelectorAll("img.hfp-overlay").forEach(function (img) {
        img.style.display = img.getAttribute("data-map") === map ? "" : "none";
        if (opacity) { img.style.opacity = String(Number(opacity.value) / 100); }
      });
      root.querySelectorAll("[data-scale]").forEach(function (el) {
        var row = data.rows[Number(el.getAttribute("data-r"))];
        var scales = byKey(row.scale, key);
        var value = scales ? scales[map] : undefined;
        el.textContent = value === undefined ? "" : el.getAttribute("data-scale") + value;
      });
      root.setAttribute("data-map", map);
      root.setAttribute("data-special", key === "visible" ? "hide" : "show");
    }
    radios.forEach(function (r) { r.addEventListener("change", render); });
    if (hide) { hide.addEventListener("change", render); }
    if (opacity) { opacity.addEventListener("input", render); }
    render();
    root.setAttribute("data-ready", "1");
  }
  document.querySelectorAll(".hfp-root:not([data-ready])").forEach(init);
})();
