-- Argo CD health check for mailtls.io/MailTLSPolicy (Lua 5.1, run by Argo CD with the
-- object in the global `obj`). Reads the conditions mailtls-operator writes
-- (Kubernetes API conventions: type, status, reason, message):
--
--   Progressing  no status yet, status.observedGeneration behind metadata.generation
--                (the operator has not seen the latest spec), or not Ready yet
--                (rolling out, or no Postfix instance to roll out to yet)
--   Degraded     a verdict that waiting will not change, a person must act:
--                Accepted=False Invalid or Conflict; Ready=False RolloutFailed, or a
--                refusal/warning the operator found in the Postfix instance
--                (TrustAnchorMissing, CheckUnavailable, UnsupportedAttribute, PolicyBypassed,
--                DNSSECDisabled, KeyFolding),
--                lines the renderer refused (UnsafeEntry), or an expired break-glass
--                exception (Expired)
--   Healthy      Ready=True and status.observedGeneration == metadata.generation
--
-- Conditions are only trusted once status.observedGeneration has caught up: an
-- Invalid verdict about the previous generation must not fail the sync that fixes it.

local DEGRADED_REASONS = {
  Accepted = { Invalid = true, Conflict = true },
  Ready = {
    Invalid = true,
    RolloutFailed = true,
    TrustAnchorMissing = true,
    CheckUnavailable = true,
    UnsupportedAttribute = true,
    UnsafeEntry = true,
    PolicyBypassed = true,
    DNSSECDisabled = true,
    KeyFolding = true,
    Expired = true,
  },
}

local function find_condition(conditions, wanted)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if type(condition) == "table" and condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function describe(condition, fallback)
  local reason = condition.reason
  local message = condition.message
  if type(reason) ~= "string" or reason == "" then
    reason = nil
  end
  if type(message) ~= "string" or message == "" then
    message = nil
  end
  if reason and message then
    return reason .. ": " .. message
  end
  return message or reason or fallback
end

local hs = {}

local status = obj.status
if type(status) ~= "table" then
  hs.status = "Progressing"
  hs.message = "Waiting for mailtls-operator to report status"
  return hs
end

local generation = nil
if type(obj.metadata) == "table" and type(obj.metadata.generation) == "number" then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if type(observed) ~= "number" then
  observed = nil
end

if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for mailtls-operator to observe generation " ..
    string.format("%d", generation) ..
    (observed and (" (status describes generation " .. string.format("%d", observed) .. ")") or "")
  return hs
end

for _, kind in ipairs({ "Accepted", "Ready" }) do
  local condition = find_condition(status.conditions, kind)
  if condition and condition.status == "False" and DEGRADED_REASONS[kind][condition.reason] then
    hs.status = "Degraded"
    hs.message = describe(condition, kind .. " is False")
    return hs
  end
end

local ready = find_condition(status.conditions, "Ready")
if ready and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Rolled out")
  return hs
end

hs.status = "Progressing"
if ready then
  hs.message = describe(ready, "Waiting for the rollout")
else
  hs.message = "Waiting for the rollout"
end
return hs
