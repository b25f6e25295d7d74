-- Runs an Argo CD health.lua the way Argo CD does: the object in the global `obj`,
-- the script's return value is the health status. Prints it as JSON.
--   lua5.1 argocd_health_harness.lua HEALTH_LUA OBJECT_JSON
local cjson = require("cjson")

local file = assert(io.open(arg[2], "r"))
local text = file:read("*a")
file:close()
obj = cjson.decode(text)

local check = assert(loadfile(arg[1]))
local hs = check()
io.write(cjson.encode({ status = hs.status, message = hs.message }))
