-- Argo CD health check for mailtls.io/MailTLSDiscovery (Lua 5.1, the object in the
-- global `obj`). Reads the Ready condition mailtls-operator writes
-- (operator/mailtls_operator/discovery/service.py):
--
--   Progressing  no status yet, status.observedGeneration behind metadata.generation,
--                or the first discovery round still running (Ready=Unknown Discovering)
--   Degraded     Ready=False: Invalid (the object is refused; the last good one stays in
--                force) or LookupFailed (a domain could not be decided: no cached policy
--                covers it, so it has no discovered line)
--   Healthy      Ready=True Discovered and status.observedGeneration is current
--
-- A discovered domain without a line (nothing published, testing mode) is healthy:
-- that is the partner's published state, reported per domain in status.domains.

local hs = {}
local status = obj.status
local generation = (obj.metadata or {}).generation

if type(status) ~= "table" then
  hs.status = "Progressing"
  hs.message = "Waiting for mailtls-operator to report status"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for mailtls-operator to observe generation " .. tostring(generation)
  return hs
end
local ready = nil
if type(status.conditions) == "table" then
  for _, condition in ipairs(status.conditions) do
    if type(condition) == "table" and condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the first discovery round"
  return hs
end
local text = tostring(ready.reason or "") .. ": " .. tostring(ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.status == "False" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = text
return hs
