-- Argo CD health check for aurora.dev/Speculator.
-- Healthy: the operator has seen the current generation, Ready is True and nothing is
-- Degraded (a canary under evaluation is normal operation, named in the message).
-- Progressing: not yet observed, servers starting or rolling out.
-- Suspended: waiting for a person, as Argo Rollouts shows a paused rollout: a canary
-- held (onInconclusive: Hold) until someone promotes or rolls it back, or the servers
-- scaled to zero (spec.engine.replicas 0).
-- Degraded: the Degraded condition is True (invalid spec, a Redis the operator may not
-- use, Redis unreachable, a stuck rollout, a stable revision slower than no speculation).
local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Aurora operator to report status"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Aurora operator to observe generation " .. tostring(generation)
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    conditions[condition.type] = condition
  end
end
local function describe(condition)
  local text = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
local ready = conditions["Ready"]
if ready == nil or ready.status ~= "True" then
  hs.status = "Progressing"
  if ready ~= nil then
    hs.message = describe(ready)
  else
    hs.message = "Waiting for the Ready condition"
  end
  return hs
end
if ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = describe(ready)
  return hs
end
local progressing = conditions["Progressing"]
if progressing ~= nil and progressing.status == "True" and progressing.reason == "RollingOut" then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end
if progressing ~= nil and progressing.reason == "Held" then
  hs.status = "Suspended"
  hs.message = describe(progressing) .. " (kubectl annotate spx " .. obj.metadata.name ..
    " aurora.dev/override=Promote:<revision>, or Rollback:<revision>)"
  return hs
end
hs.status = "Healthy"
hs.message = describe(ready)
if progressing ~= nil and progressing.status == "True" then
  hs.message = hs.message .. "; " .. describe(progressing)
end
return hs
